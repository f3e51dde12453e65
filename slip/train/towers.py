"""Where a new dual encoder's starting weights come from: pretrained towers on disk, or random on purpose.

:func:`build_dual_encoder` assembles a :class:`~slip.rankers.dual_encoder.DualEncoder` from a
:class:`~slip.rankers.dual_encoder.DualEncoderConfig`. Nothing here touches the network, and nothing
starts random unless the config says so:

* image backbone (timm, pooled, ``num_classes=0``): ``pretrained_image=True`` loads
  ``<SLIP_CACHE>/timm/<name>.{safetensors,pth,bin}`` or the model's hub file (e.g.
  ``timm/resnet50.a1_in1k``) from ``<SLIP_CACHE>/hf`` or the default Hugging Face cache, else
  :class:`~slip.errors.WeightsNotFoundError` naming the file and ``slip weights fetch <hub id>``;
  ``pretrained_image=False`` is timm's random init;
* text encoder (transformers): ``minilm`` (the offline pretrained all-MiniLM-L6-v2 package), a local
  directory, or a hub id cached in ``<SLIP_CACHE>/hf``; ``pretrained_text=True`` loads its weights, and
  refuses a directory whose files would leave tensors at random init; ``pretrained_text=False`` builds it
  from its config (a well-known id such as ``distilbert-base-uncased`` needs no file at all).
  ``tiny-random`` (a 2-layer DistilBERT for tests) exists only with ``pretrained_text=False``.

The returned ``init`` dict (``{"image": "pretrained: <file>" | "random", "text": ...}``) goes into the
checkpoint's config.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slip.errors import ConfigError, WeightsError, WeightsNotFoundError, first_line
from slip.rankers.dual_encoder import MINILM_ALIASES, TINY_TEXT, DualEncoder, DualEncoderConfig, minilm_path


def build_dual_encoder(config: DualEncoderConfig, *, cache_dir: Path | None = None,
                       seed: int | None = 0) -> tuple[DualEncoder, object, dict]:
    """A fresh model from ``config``: ``(model, tokenizer, init)``.

    ``init`` records where each part's weights came from (``"pretrained: <file>"`` or ``"random"``).
    A part is random only when asked for (``pretrained_image`` / ``pretrained_text`` False, or the
    ``tiny-random`` text encoder with ``pretrained_text`` False); a pretrained part whose weights are not
    on disk is :class:`WeightsNotFoundError` naming the file, the cache and the fetch command.
    ``seed`` seeds the random parts (heads, random backbones); ``None`` leaves the global RNG alone.
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        image_encoder, mean, std, image_init = _image_backbone(config, cache_dir)
        text_encoder, tokenizer, text_init = _text_encoder(config, cache_dir)
        model = DualEncoder(config, image_encoder, text_encoder, mean=mean, std=std)
    return model, tokenizer, {"image": image_init, "text": text_init}


def _image_backbone(config: DualEncoderConfig, cache_dir: Path | None):
    import timm

    name = config.image_backbone
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm image backbone {name!r} (e.g. resnet50, resnet18, test_resnet)")
    if config.pretrained_image:
        weights = _local_timm_weights(name, cache_dir)
        if weights is None:
            raise WeightsNotFoundError(_missing_backbone_message(name, cache_dir))
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": str(weights)})
        except (OSError, RuntimeError, ValueError) as e:
            raise WeightsError(f"cannot load image backbone {name!r} from {weights}: {first_line(e)}") from e
        _check_backbone_complete(name, model, weights)
        init = f"pretrained: {weights}"
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        init = "random"
    data = timm.data.resolve_data_config({}, model=model)
    return model, tuple(data["mean"]), tuple(data["std"]), init


def _check_backbone_complete(name: str, model: torch.nn.Module, weights: Path) -> None:
    """WeightsError when ``weights`` lacks tensors of the backbone: timm loads a headless model with
    ``strict=False`` and would leave them at random init without a word."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                stored = set(f.keys())
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
            stored = set(state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else ())
    except Exception as e:  # safetensors / pickle / zip errors share no base class; all mean "unreadable"
        raise WeightsError(f"cannot read image backbone weights {weights}: {first_line(e)}") from e
    missing = [k for k in model.state_dict() if k not in stored and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{weights} lacks {len(missing)} tensors of image backbone {name!r} (e.g. {missing[0]!r}), "
                           "which would start random: fetch the file again, or pass --random-image to train from "
                           "random init on purpose")


def _timm_cache_dir(cache_dir: Path | None) -> Path:
    from slip.weights import resolve_cache_dir

    return resolve_cache_dir(cache_dir) / "timm"


def _timm_hub_id(name: str) -> str | None:
    """The Hugging Face hub repo of a timm model's default pretrained weights (e.g. timm/resnet50.a1_in1k)."""
    import timm.models

    return getattr(timm.models.get_pretrained_cfg(name) or object(), "hf_hub_id", None)


def _missing_backbone_message(name: str, cache_dir: Path | None) -> str:
    """One line: the file looked for, the caches, how to fetch it, and the explicit way to train from random."""
    import timm.models

    from slip.weights import CACHE_ENV, hf_cache

    target = _timm_cache_dir(cache_dir) / f"{name.split('.')[0]}.safetensors"
    hub_id = _timm_hub_id(name)
    if hub_id:
        fetch = f"fetch it with `slip weights fetch {hub_id}` (into {hf_cache(cache_dir)})"
    else:
        url = getattr(timm.models.get_pretrained_cfg(name) or object(), "url", None) or "its timm release"
        fetch = f"download {url} by hand"
    return (f"pretrained weights of image backbone {name!r} not found: looked for {target} (weights cache set by the "
            f"env var {CACHE_ENV}) and in the Hugging Face caches; {fetch}, or put the weight file at {target}; "
            "or pass --random-image (pretrained_image=False) to train it from random init on purpose")


def _local_timm_weights(name: str, cache_dir: Path | None) -> Path | None:
    """``<cache>/timm/<name>.{safetensors,pth,bin}``, else the model's hub file in a local HF cache."""
    base = name.split(".")[0]
    for suffix in (".safetensors", ".pth", ".bin"):
        path = _timm_cache_dir(cache_dir) / f"{base}{suffix}"
        if path.is_file():
            return path
    from huggingface_hub import try_to_load_from_cache

    from slip.weights import hf_cache

    hub_id = _timm_hub_id(name)
    for hub_cache in (hf_cache(cache_dir), None):
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename, cache_dir=hub_cache) if hub_id else None
            if isinstance(found, str):
                return Path(found)
    return None


def _text_encoder(config: DualEncoderConfig, cache_dir: Path | None):
    """``(model, tokenizer, init)`` for ``config.text_encoder`` (never touches the network)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, DistilBertConfig

    spec = config.text_encoder
    if spec == TINY_TEXT:
        if config.pretrained_text:
            raise ConfigError(f"text encoder {TINY_TEXT!r} has no pretrained weights (a randomly initialised test "
                              "model): pass --random-text (pretrained_text=False) to use it")
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
        tiny = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                max_position_embeddings=max(config.max_text_tokens, 64))
        return AutoModel.from_config(tiny), tokenizer, "random (tiny-random)"
    directory = _text_directory(spec, cache_dir)
    if directory is None:
        return _random_known_text_encoder(spec, config, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        if not config.pretrained_text:
            return AutoModel.from_config(AutoConfig.from_pretrained(str(directory))), tokenizer, "random"
        model, info = AutoModel.from_pretrained(str(directory), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot load text encoder {spec!r} from {directory}: {first_line(e)}") from e
    _check_complete(spec, directory, info)
    return model, tokenizer, f"pretrained: {directory}"


def _check_complete(spec: str, directory: Path, info: dict) -> None:
    """WeightsError when transformers would leave tensors at random init (missing or mis-shaped in the files);
    the unused pooler is exempt (the dual encoder pools the last hidden state itself)."""
    missing = sorted(k for k in [*info.get("missing_keys", ()), *(m[0] if isinstance(m, tuple) else m
                                                                   for m in info.get("mismatched_keys", ()))]
                     if not k.startswith("pooler."))
    if missing:
        raise WeightsError(f"text encoder {spec!r} in {directory} lacks pretrained weights for {len(missing)} tensors "
                           f"(e.g. {missing[0]!r}), which would start random: re-fetch it with `slip weights fetch "
                           f"{spec}`, or pass --random-text to train it from random init on purpose")


def _text_directory(spec: str, cache_dir: Path | None) -> Path | None:
    """Local directory of a text encoder spec: MiniLM alias, an existing dir, or a cached hub snapshot."""
    if spec in MINILM_ALIASES:
        return minilm_path()
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    from slip.weights import hf_cache

    for hub_cache in (hf_cache(cache_dir), None):
        try:
            return Path(snapshot_download(spec, cache_dir=hub_cache, local_files_only=True))
        except Exception:  # not cached there (LocalEntryNotFoundError, a malformed id, ...): try the next
            continue
    return None


# architectures buildable without any downloaded file (their uncased WordPiece vocab = MiniLM's vocab.txt)
_DISTILBERT_IDS = ("distilbert-base-uncased", "distilbert/distilbert-base-uncased")
_BERT_IDS = ("bert-base-uncased", "google-bert/bert-base-uncased")


def _known_text_config(spec: str, vocab_size: int):
    """The transformers config of a well-known uncased text encoder, or None."""
    from transformers import BertConfig, DistilBertConfig

    if spec in _DISTILBERT_IDS:
        return DistilBertConfig(vocab_size=vocab_size)
    if spec in _BERT_IDS:
        return BertConfig(vocab_size=vocab_size)
    return None


def _random_known_text_encoder(spec: str, config: DualEncoderConfig, cache_dir: Path | None):
    """A text encoder that is not on disk: random on purpose for a well-known architecture, else an error."""
    from transformers import AutoModel, AutoTokenizer

    from slip.weights import CACHE_ENV, hf_cache

    known = spec in _DISTILBERT_IDS + _BERT_IDS
    if config.pretrained_text or not known:
        random = " pass --random-text to train it from random init on purpose," if known else ""
        raise WeightsNotFoundError(
            f"text encoder {spec!r} is not on disk (looked in the Hugging Face cache {hf_cache(cache_dir)}, set by the "
            f"env var {CACHE_ENV}, and in the default Hugging Face cache): fetch it with `slip weights fetch {spec}`, "
            f"give a local directory,{random} or use --text-encoder minilm (pretrained, offline)")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))  # the same uncased WordPiece vocabulary
    return AutoModel.from_config(_known_text_config(spec, len(tokenizer))), tokenizer, "random"


__all__ = ["build_dual_encoder"]
