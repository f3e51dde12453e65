"""``slip weights``: download model weights into the cache (``$SLIP_CACHE``) and list what is there."""

from __future__ import annotations

from pathlib import Path

import typer

from slip.cli.common import cache_dir_from_env, user_errors
from slip.errors import ConfigError
from slip.weights import (
    BUNDLE_COMMANDS,
    BUNDLED_DIR,
    HUB_ALIASES,
    OFFICIAL_SAM,
    OPEN_CLIP_PREFIX,
    fetch_clip,
    fetch_sam,
    hf_cache,
    hub_id,
    resolve_cache_dir,
)

weights_app = typer.Typer(
    name="weights", help="Download and list model weights (cache: $SLIP_CACHE, default ~/.cache/slip).",
    no_args_is_help=True, add_completion=False,
)


@weights_app.command()
def fetch(
    name: str = typer.Argument(..., help="vit_b, vit_l, vit_h (official SAM); an engine's short name "
                                         "(sam2.1-hiera-tiny .. sam2.1-hiera-large, sam2-hiera-*, sam3, "
                                         "sam3-tracker, edgetam, siglip, siglip2); or a Hugging Face id such as "
                                         "openai/clip-vit-base-patch32, "
                                         "facebook/sam2.1-hiera-large, google/siglip2-base-patch16-224 or "
                                         "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K (open_clip)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Download one model into the weights cache and verify it."""
    cache_dir = cache_dir_from_env()
    with user_errors():
        if name in OFFICIAL_SAM:
            path = fetch_sam(name, cache_dir, progress=not quiet)
        elif name in HUB_ALIASES or "/" in name:
            path = fetch_clip(hub_id(name), cache_dir)
        elif name in ("synth", *BUNDLE_COMMANDS):
            raise ConfigError(
                f"{name!r} is bundled, not downloaded: build it with "
                f"`{BUNDLE_COMMANDS['synth-sam']}` / `{BUNDLE_COMMANDS['synth-clip']}`"
            )
        else:
            raise ConfigError(
                f"unknown weights name {name!r}: use {', '.join(OFFICIAL_SAM)}, one of {', '.join(HUB_ALIASES)}, "
                f"or a Hugging Face id such as openai/clip-vit-base-patch32 ({OPEN_CLIP_PREFIX}org/name for open_clip)"
            )
    typer.echo(str(path))


@weights_app.command("list")
def list_weights() -> None:
    """Show the models in the weights cache and the bundled ones, with their sizes."""
    cache_dir = cache_dir_from_env()
    cache = resolve_cache_dir(cache_dir)
    typer.echo(f"weights cache: {cache}")
    for model_type, entry in OFFICIAL_SAM.items():
        path = cache / "sam" / entry.filename
        status = _size(path) if path.is_file() else f"missing (slip weights fetch {model_type})"
        typer.echo(f"  sam {model_type:<6} {entry.filename:<24} {status}")
    for repo_id, size in _hf_repos(hf_cache(cache_dir)):
        typer.echo(f"  hf  {repo_id:<31} {_human(size)}")
    for name, command in BUNDLE_COMMANDS.items():
        path = BUNDLED_DIR / name
        status = _size(path) if path.is_dir() else f"not built ({command})"
        typer.echo(f"  bundled {name:<27} {status}")


def _hf_repos(hf_dir: Path) -> list[tuple[str, int]]:
    """``(repo id, bytes on disk)`` of each model in a Hugging Face cache."""
    if not hf_dir.is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hf_dir)
    return sorted((repo.repo_id, repo.size_on_disk) for repo in info.repos if repo.repo_type == "model")


def _size(path: Path) -> str:
    """Human-readable size of a file, or of all files under a directory."""
    if path.is_file():
        return _human(path.stat().st_size)
    return _human(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))


def _human(n: int) -> str:
    """``n`` bytes as ``123 B`` / ``1.5 MiB`` / ``2.4 GiB``."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
