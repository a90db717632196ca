"""Reading what a run starts from: model and data references (``sources.py``), devices and dtypes, loading models,
tokenizers and their ``config.json`` (``loading.py``), and how local paths are recorded (``portable.py``). Below the
model classes: nothing here imports them (a delta export loads its base through ``loading.py``)."""
