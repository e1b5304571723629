"""The shipped pre-training presets: ``explora/presets/<name>.yaml``, loaded by name or by path.

``explora pretrain --config dinov2_vitl14_fmow_D-L-r64`` finds the file here; ``explora presets`` lists them. Each file
opens with a comment saying where its values come from; its first line is the one-line description.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from explora.core.config import load_yaml
from explora.core.errors import ConfigError

PRESET_DIR = Path(__file__).parent


@dataclass(frozen=True)
class PresetInfo:
    """One line of ``explora presets``."""

    name: str
    objective: str
    model: str
    explora_preset: str
    description: str


def names() -> list[str]:
    """Every shipped preset, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A config file: an existing path as given, else the shipped preset of that name (``.yaml`` optional)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = PRESET_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    close = difflib.get_close_matches(path.stem, names(), n=1, cutoff=0.5)
    hint = f" Did you mean the preset '{close[0]}'?" if close else ""
    raise ConfigError(
        f"config file {name_or_path} does not exist, nor is it the name of a shipped preset.{hint} "
        "`explora presets` lists the presets; a path to your own YAML file works too."
    )


def _description(path: Path, width: int = 100) -> str:
    """The file's opening comment, up to its first sentence end, at most ``width`` characters."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    end = min((i for i in (text.find(". "), text.find("; ")) if i > 0), default=len(text))
    text = text[: end + 1].rstrip(";")
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def info(name: str) -> PresetInfo:
    """Objective, model and ExPLoRA preset of a shipped preset (its ``_base_`` chain resolved)."""
    path = config_path(name)
    data = load_yaml(path)
    return PresetInfo(
        name=path.stem,
        objective=str(data.get("objective", "dinov2")),
        model=str(data.get("model", {}).get("name", "")),
        explora_preset=str(data.get("adapt", {}).get("preset", "")),
        description=_description(path),
    )


__all__ = ["PRESET_DIR", "PresetInfo", "config_path", "info", "names"]
