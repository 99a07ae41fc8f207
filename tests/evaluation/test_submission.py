"""The whole-file submission reader against a line-by-line reference reader: the same arrays for
well-formed files, the same first error (file, line, kind) for malformed ones."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.evaluation.submission import SubmissionFormatError, read_voc_submission_file


def reference_read(path):
    """The format's definition, one line at a time: ``(ids, scores, boxes)`` or ``(line number, kind)``."""
    ids, scores, boxes = [], [], []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                return lineno, "expected"
            try:
                values = [float(v) for v in fields[1:]]
            except ValueError:
                return lineno, "non-numeric"
            if not np.all(np.isfinite(values)):
                return lineno, "non-finite"
            ids.append(fields[0])
            scores.append(values[0])
            boxes.append(values[1:])
    return ids, np.array(scores), np.array(boxes).reshape(-1, 4)


def random_lines(rng: np.random.Generator, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        values = [f"{rng.random():.9g}"] + [f"{v:.3f}" for v in rng.uniform(1, 500, 4)]
        sep = rng.choice([" ", "\t", "  ", " \t "])
        line = sep.join([f"{rng.integers(0, 10 ** 6):06d}", *values])
        if rng.random() < 0.1:
            line = "   " + line + "  "
        lines.append(line)
        if rng.random() < 0.05:
            lines.append(rng.choice(["", "   ", "\t"]))
    return lines


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("seed", range(3))
def test_well_formed_files_read_as_the_reference(tmp_path, seed, newline):
    rng = np.random.default_rng(seed)
    path = tmp_path / "comp4_det_test_cat.txt"
    lines = random_lines(rng, 200)
    path.write_bytes(newline.join(lines).encode() + (newline.encode() if seed else b""))
    ids, scores, boxes = reference_read(path)
    got = read_voc_submission_file(path)
    assert got.image_ids.tolist() == ids
    np.testing.assert_array_equal(got.scores, scores)
    np.testing.assert_array_equal(got.boxes_voc, boxes)


BAD_LINES = {
    "expected": ["img 0.5 1 2 3", "img 0.5 1 2 3 4 5", "img"],
    "non-numeric": ["img 0.5 1 2 three 4", "img 0x1 1 2 3 4", "img 0.5 1,0 2 3 4"],
    "non-finite": ["img nan 1 2 3 4", "img 0.5 1 2 inf 4", "img 0.5 -Infinity 2 3 4"],
}


@pytest.mark.parametrize("seed", range(12))
def test_the_first_bad_line_is_named_as_the_reference_names_it(tmp_path, seed):
    rng = np.random.default_rng(100 + seed)
    lines = random_lines(rng, 60)
    for _ in range(int(rng.integers(1, 4))):  # one to three bad lines, of any kinds, anywhere
        kind = rng.choice(list(BAD_LINES))
        lines.insert(int(rng.integers(0, len(lines) + 1)), str(rng.choice(BAD_LINES[kind])))
    path = tmp_path / "comp4_det_val_dog.txt"
    path.write_text("\n".join(lines) + "\n")
    lineno, kind = reference_read(path)
    with pytest.raises(SubmissionFormatError) as exc:
        read_voc_submission_file(path)
    message = str(exc.value)
    assert message.startswith(f"{path}:{lineno}: {kind}"), (message, lineno, kind)
    assert repr(lines[lineno - 1].strip()) in message


def test_empty_and_blank_files(tmp_path):
    for content in (b"", b"\n\n  \n", b"\t"):
        path = tmp_path / "comp4_det_test_cat.txt"
        path.write_bytes(content)
        got = read_voc_submission_file(path)
        assert len(got) == 0 and got.boxes_voc.shape == (0, 4)
