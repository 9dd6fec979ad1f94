"""The web app (`framepack serve`): a Gradio page over a persistent job queue."""
