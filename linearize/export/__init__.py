"""Writing what a run produces: export folders and the rules every writer follows (``writer.py``: never replace what
linearize did not write; result files marked as ours), the model card (``card.py``) and what ``linearize info`` says
of an export (``describe.py``)."""
