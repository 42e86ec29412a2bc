"""Vision-language models: preference rows with images, models through mlx-vlm.

Everything that knows about images or mlx-vlm lives here; the rest of mlx-pref reaches it
through a few seams. Modules, in the order data flows:

- ``images``: a row's ``images`` (or ``image``) field read and checked: paths relative to
  the data file's folder, image bytes from parquet (``{"bytes", "path"}``), data URIs.
- ``processor``: ``VisionTokenizer``, a VLM's tokenizer with its processor. It goes where
  mlx-pref passes a tokenizer; the data pipeline sees the processor and turns each row's
  image placeholders into image tokens, TRL's vision format.
- ``model``: loading through mlx-vlm (the ``mlx-pref[vision]`` extra), and LoRA adapters on
  the language model only, in the spelling ``mlx_vlm.load(..., adapter_path=...)`` reads.
- ``forward``: completion log-probs of a batch with images, the LM head on completion
  positions only, a pair's prompt (and its images) run once.

This package imports nothing heavy at import time: mlx-vlm and Pillow load when a vision
model or an image is met.
"""
