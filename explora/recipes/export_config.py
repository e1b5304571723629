"""Configs of ``explora export`` (merge LoRA, write files), ``explora params`` (trainable-parameter report) and
``explora push`` (upload an export to the Hugging Face Hub).

``export`` and ``params`` take the ExPLoRA parameterisation as an :class:`~explora.models.adapt.ExploraSpec` section
(``adapt``), whose fields are also their flags (``--preset``, ``--lora-rank``, ``--unfrozen-blocks`` ...), or an
ExploraSpec YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from explora.core.config import section
from explora.core.errors import ConfigError
from explora.models.adapt import ExploraSpec, preset_spec
from explora.models.export import FORMATS


def _spec_file(path: str) -> ExploraSpec:
    if not Path(path).is_file():
        raise ConfigError(f"--spec {path}: file not found; expected an ExploraSpec YAML file")
    return ExploraSpec.from_yaml(Path(path).read_text())


@dataclass
class ExportConfig:
    """Load adapted weights, merge LoRA and write the export formats."""

    model: str = ""  # backbone short name or timm name the weights belong to
    weights: str = ""  # adapted checkpoint (with LoRA tensors) or any upstream file
    out: str = ""  # output directory
    formats: tuple[str, ...] = FORMATS  # subset of safetensors, encoder, teacher (comma-separated on the CLI)
    timm_name: str | None = None  # timm architecture to record (default: the registry's for model)
    spec: str | None = None  # an ExploraSpec YAML file (overrides adapt)
    adapt: ExploraSpec | None = section(None, read=ExploraSpec.from_config)  # null: the checkpoint's explora_spec

    def validate(self) -> None:
        for key in ("model", "weights", "out"):
            if not getattr(self, key):
                raise ConfigError(f"explora export: {key} is required: give --{key} VALUE (or {key}=VALUE).")
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown:
            raise ConfigError(f"config.formats: unknown format(s) {unknown}; expected a subset of {list(FORMATS)}.")

    def explora_spec(self) -> ExploraSpec | None:
        """The spec to apply before loading LoRA tensors: ``spec`` file, else ``adapt``, else None (the file's)."""
        return _spec_file(self.spec) if self.spec else self.adapt


@dataclass
class ParamsConfig:
    """Trainable parameters of a backbone under an ExPLoRA spec, or of a pre-training config's objective."""

    model: str | None = None  # backbone short name (e.g. dinov2_vitl14) or timm name
    config: str | None = None  # a pretrain config (file or preset name): its objective's report; --memory: its memory
    memory: bool = False  # with config: predicted peak training memory; with model only: weights/gradients/AdamW
    # with --memory: the dinov2.split_backward auto choice for a device with this many GiB (default: this machine's
    # GPU free memory, else its available memory)
    available_gib: float | None = None
    in_chans: int = 3  # input channels (1: grayscale backbone with the RGB patch filters summed)
    json: bool = False  # print JSON instead of Markdown
    spec: str | None = None  # an ExploraSpec YAML file (overrides adapt)
    adapt: ExploraSpec = section(lambda: preset_spec("D-[L]-r64"), read=ExploraSpec.from_config)

    def explora_spec(self) -> ExploraSpec:
        return _spec_file(self.spec) if self.spec else self.adapt


@dataclass
class PushConfig:
    """Upload an export (or a run's export) to the Hugging Face Hub."""

    path: str = ""  # an export folder (with model.json) or a run directory holding export/ or best/
    repo: str = ""  # Hub repository id, user/name
    private: bool = True  # create the repository private (an existing one keeps its visibility)
    revision: str | None = None  # branch to push to (default: main)
    message: str = "Upload ExPLoRA export"  # commit message
    evals: list[str] = field(default_factory=list)  # evaluation run dirs (linprobe/knn/finetune): card rewritten

    def validate(self) -> None:
        for key in ("path", "repo"):
            if not getattr(self, key):
                raise ConfigError(f"explora push: {key} is required (explora push RUN_OR_EXPORT --repo user/name)")


__all__ = ["ExportConfig", "ParamsConfig", "PushConfig"]
