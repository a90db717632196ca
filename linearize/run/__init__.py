"""The run skeleton every stage shares: the step loop and work folder (``loop.py``), checkpoints, progress, one lock
per output folder, CPU threads, and process coordination (``processes.py``: one process or every process of a
``torchrun`` / ``accelerate launch``, and one idiom, :func:`~linearize.run.processes.on_main`)."""
