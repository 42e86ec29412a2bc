"""Export a run for others, one file per format, and push it to the Hugging Face Hub.

- ``mlx`` (``mlx.py``): the adapter exactly as mlx-lm loads it, with a model card.
- ``peft`` (``peft.py``): the adapter for PEFT/transformers on the original model.
- ``fused`` (``fused.py``): the adapter merged into the base, in the Hugging Face layout.
- ``gguf`` (``gguf_model.py``): the fused model as one GGUF file for llama.cpp, with an
  Ollama Modelfile (``ollama.py``).
- ``gguf-lora`` (``gguf_lora.py``): the adapter as a llama.cpp GGUF LoRA adapter.

``export_run`` (``writer.py``) is the entry point; ``run.py`` reads a run and names its
base model; ``card.py`` writes the model card; ``hub.py`` uploads; ``gguf_meta.py`` holds
the GGUF metadata both GGUF formats write.
"""

from mlx_pref.export.hub import (
    HubError,
    describe_upload,
    push_to_hub,
    upload_files,
    validate_repo_id,
)
from mlx_pref.export.run import BaseModel, ExportError, Run, identify_base, read_run
from mlx_pref.export.writer import FORMATS, default_output, export_and_push, export_run

__all__ = [
    "FORMATS",
    "BaseModel",
    "ExportError",
    "HubError",
    "Run",
    "default_output",
    "describe_upload",
    "export_and_push",
    "export_run",
    "identify_base",
    "push_to_hub",
    "read_run",
    "upload_files",
    "validate_repo_id",
]
