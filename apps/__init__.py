"""Applications built on the toolkit (the Gradio comparison demo)."""
