"""What an export reads: a finished run (or one of its checkpoints) and its base model."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.nn as nn
import yaml

from mlx_pref.adapters import ADAPTER_CONFIG, ADAPTER_FILE
from mlx_pref.checkpoint import CHECKPOINTS, read_state
from mlx_pref.config import RUN_CONFIG, Config, load_config
from mlx_pref.errors import MlxPrefError
from mlx_pref.model_folder import WEIGHTS, checkpoint_keys, weight_files
from mlx_pref.models import embedded_root, resolve_model_path
from mlx_pref.progress import read_metrics

CARD_FILE = "README.md"
HUB_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")


class ExportError(MlxPrefError):
    """A run cannot be exported in the requested format (missing file, unsupported layer)."""


@dataclass
class Run:
    """What an export reads from a run directory (or one of its checkpoints)."""

    root: Path
    """The run directory: config.yaml, metrics.jsonl."""
    adapter_dir: Path
    """Where the adapter files are: the run directory, or a checkpoint inside it."""
    config: Config
    adapter_config: dict
    step: int | None = None
    """The checkpoint's step, or None for the run's final adapters."""
    metrics: list[dict] = field(default_factory=list)

    @property
    def dora(self) -> bool:
        return self.adapter_config.get("fine_tune_type", "lora") == "dora"

    @property
    def full(self) -> bool:
        """Full fine-tuning: the run holds a whole model folder, no adapter."""
        return self.config.full


@dataclass
class BaseModel:
    """The model the adapter was trained on, and how to name it for others."""

    spec: str | None
    """As the run's config names it (None: the embedded tiny model)."""
    hub_id: str | None
    """Its Hugging Face Hub id, when known."""
    name: str
    license: str | None = None

    @property
    def gguf(self) -> bool:
        return self.spec is not None and self.spec.endswith(".gguf")

    def local_path(self) -> Path:
        """A local directory holding it (downloads a Hub model that is not cached)."""
        return resolve_model_path(self.spec)

    def pretrained_id(self) -> str:
        """What a user passes to ``from_pretrained`` / ``mlx_lm.load`` to get this base."""
        if self.hub_id:
            return self.hub_id
        return str(self.local_path().resolve())

    def config(self) -> dict:
        """Its Hugging Face config (for a GGUF, the one its metadata describes)."""
        if self.gguf:
            from mlx_pref.gguf import gguf_config, read_gguf_header

            return gguf_config(*read_gguf_header(self.spec))
        return read_json(self.local_path() / "config.json")

    def weight_names(self) -> set[str]:
        """Its tensor names in the Hugging Face layout, read from file headers only."""
        if self.gguf:
            from mlx_pref.gguf import hf_tensor_names

            return hf_tensor_names(self.spec)
        return checkpoint_keys(self.local_path())

    def skeleton(self) -> nn.Module:
        """Its mlx-lm module tree, weights left unread (lazy): enough to rebuild layers."""
        if self.gguf:
            from mlx_lm.models import llama

            return llama.Model(llama.ModelArgs.from_dict(self.config()))
        from mlx_lm.utils import load_model as mlx_load_model

        return mlx_load_model(self.local_path(), lazy=True)[0]


def read_run(run_dir: str | Path) -> Run:
    """The config, adapter config and metrics of a finished run or one of its checkpoints."""
    adapter_dir = Path(run_dir)
    if not adapter_dir.is_dir():
        raise ExportError(f"{adapter_dir}: no such run directory")
    in_checkpoint = adapter_dir.parent.name == CHECKPOINTS
    root = adapter_dir.parent.parent if in_checkpoint else adapter_dir
    if not (root / RUN_CONFIG).is_file():
        raise ExportError(f"{root / RUN_CONFIG} is missing: {_missing_hint(root, root)}")
    config = load_config(root / RUN_CONFIG)
    if config.full:
        weights = weight_files(adapter_dir)
        for path in (adapter_dir / "config.json", weights[0] if weights else None):
            if path is None or not path.is_file():
                path = path or adapter_dir / WEIGHTS
                raise ExportError(f"{path} is missing: {_missing_hint(root, path)}")
        adapter_config = {"fine_tune_type": "full"}
    else:
        for path in (adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_FILE):
            if not path.is_file():
                raise ExportError(f"{path} is missing: {_missing_hint(root, path)}")
        adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    step = read_state(adapter_dir)["step"] if in_checkpoint else None
    metrics = [r for r in read_metrics(root) if step is None or r.get("step", 0) <= step]
    return Run(root, adapter_dir, config, adapter_config, step, metrics)


def _missing_hint(root: Path, path: Path) -> str:
    if path.name in (ADAPTER_FILE, WEIGHTS) and (root / CHECKPOINTS).is_dir():
        latest = sorted((root / CHECKPOINTS).glob("step-*"))
        if latest:
            return (
                f"the run has not finished; resume it, or export its latest checkpoint {latest[-1]}"
            )
    return "not an mlx-pref run directory (expected config.yaml, adapters.safetensors, adapter_config.json)"


def identify_base(config: Config, override: str | None = None) -> BaseModel:
    """Name the run's base model (Hub id, display name, license) without downloading it."""
    spec = config.model
    local = None
    if spec is None:
        try:
            local = embedded_root("tiny-chat")
        except MlxPrefError:  # only needed for its license; the formats that need it will say
            local = None
    elif Path(spec).expanduser().exists():
        local = Path(spec).expanduser()
    hub_id = override or _hub_id(spec, local)
    if hub_id:
        name = hub_id
    elif spec is None:
        name = "mlx-pref's embedded tiny-chat model"
    else:
        name = Path(spec).name
    license_ = _front_matter(local / CARD_FILE).get("license") if local and local.is_dir() else None
    return BaseModel(spec=spec, hub_id=hub_id, name=name, license=license_)


def _hub_id(spec: str | None, local: Path | None) -> str | None:
    """The Hub id of a model named by id, or found in the Hub cache's ``models--org--name``."""
    if spec is None:
        return None
    if local is None:
        return spec if spec.count("/") == 1 else None
    for part in local.resolve().parts:
        match = HUB_CACHE_DIR.match(part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def _front_matter(path: Path) -> dict:
    """The YAML front matter of a model card, or {} if it has none."""
    if not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    block = text[3:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Destination:
    """Where an export is written, and the Hub repo it is meant for (if any)."""

    output: Path
    repo_id: str | None = None
