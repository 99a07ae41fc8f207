"""The LMDB bridge: SSD-Caffe LMDBs of ``AnnotatedDatum`` records ↔ VOC folders and COCO JSON.

``python -m converters.lmdb`` (see ``__main__``) has four commands:

* ``inspect LMDB [--json OUT.json]`` -- every record decoded (:mod:`.records`);
* ``to-voc LMDB OUT_DIR`` and ``to-coco LMDB OUT.json --images-dir DIR``
  (:mod:`.export`);
* ``from-voc ROOT LIST.txt OUT_LMDB --labelmap FILE`` -- what SSD's
  ``convert_annoset`` writes, record for record (:mod:`.annoset`).

Reading for training is :class:`toolkit.data.caffe_lmdb.LMDBDetection`
(``--dataset lmdb:PATH``); this package only converts.
"""

from converters.lmdb.annoset import AnnosetOptions, ConversionReport, convert_annoset, read_annoset_list
from converters.lmdb.export import ExportReport, lmdb_to_coco, lmdb_to_voc
from converters.lmdb.records import InspectResult, inspect_lmdb, record_to_json, summarize, write_json

__all__ = [
    "AnnosetOptions", "ConversionReport", "ExportReport", "InspectResult", "convert_annoset", "inspect_lmdb",
    "lmdb_to_coco", "lmdb_to_voc", "read_annoset_list", "record_to_json", "summarize", "write_json",
]
