"""Which image files a command line names, what to call them, and where their outputs may go.

``slip segment`` and ``slip submit segment`` take the same arguments: files, directories (searched
recursively for image files, hidden ones skipped) and glob patterns. Each image is named by its path
relative to the *submitted root* — the deepest folder holding every input — with ``/`` separators, so
exports carry ``cats/a.jpg`` rather than one machine's absolute path. Names come from the paths as given,
never from where a symbolic link points: a link in a submitted folder to a file elsewhere is named as the
link (its bytes are the target's); links to folders are not followed. Output folders derived from those
names stay inside the output directory whatever the file is called (``...png``, ``..``, odd characters).
Names other tools wrote for the same images (a COCO truth's ``file_name``, a labelling tool's export) are
matched to these by their ends (:func:`match_files`).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence, TypeVar

from slip.errors import InputError

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif"})
GLOB_CHARS = frozenset("*?[")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
T = TypeVar("T")
UPLOAD_PREFIX = re.compile(r"[0-9a-f]{8}-(.+)")  # Label Studio's name for an uploaded file: 8 hex digits, "-", its name


def is_image_name(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Absolute image files from files, directories (recursive, image extensions, no hidden parts) and glob
    patterns, in the order given, each once; InputError naming the argument that matched nothing. Paths are
    made absolute without resolving symbolic links (a link keeps its own name and folder)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p) and not _hidden(p, path))
        elif GLOB_CHARS & set(str(raw)):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        else:
            raise InputError(f"no such file or directory: {raw}")
        if not files:
            raise InputError(f"no images found in {raw} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        found.extend(files)
    return list(dict.fromkeys(Path(os.path.abspath(p)) for p in found))


def submitted_root(files: Sequence[Path]) -> Path:
    """The deepest folder that holds every file (a single file's own folder)."""
    if not files:
        raise InputError("no input files")
    return Path(os.path.commonpath([str(p.parent) for p in files]))


def relative_names(files: Sequence[Path]) -> list[str]:
    """Each file's path relative to :func:`submitted_root`, ``/``-separated."""
    root = submitted_root(files)
    return [p.relative_to(root).as_posix() for p in files]


def output_folder(out: Path, name: str) -> Path:
    """The output folder of the image called ``name`` (a relative name): ``out/<name without extension>``,
    every part made safe; never outside ``out``."""
    parts = [_safe_part(part) for part in Path(name).with_suffix("").parts]
    folder = out.joinpath(*parts) if parts else out / "_"
    if not folder.resolve().is_relative_to(out.resolve()):  # belt and braces: the parts are already safe
        raise InputError(f"output name {name!r} would leave {out}")
    return folder


def unique_folders(out: Path, names: Sequence[str]) -> list[Path]:
    """:func:`output_folder` of each name, ``-2``, ``-3`` ... appended where two names map to one folder."""
    seen: dict[Path, int] = {}
    folders = []
    for name in names:
        folder = output_folder(out, name)
        seen[folder] = seen.get(folder, 0) + 1
        folders.append(folder if seen[folder] == 1 else folder.with_name(f"{folder.name}-{seen[folder]}"))
    return folders


def _safe_part(part: str) -> str:
    """One path component: odd characters become ``_``, and it never starts with a dot (so never ``..``)."""
    part = _UNSAFE.sub("_", part)
    return "_" + part[1:] if part.startswith(".") else (part or "_")


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def match_files(file_names: Sequence[str], paths: Sequence[str]) -> dict[int, int]:
    """Which of ``paths`` each of ``file_names`` names (a COCO truth's, a labelling tool's image names):
    ``{file_name index: path index}``.

    Tools write ``file_name`` their own way: relative to the image folder (``circle/00000.png``), with the
    export's folder in front (Label Studio: ``images/photo.jpg``), as the server's path
    (``/data/upload/1/photo.jpg``), with backslashes. A name matches the one path that ends with its last
    ``k`` parts, trying its whole length first and then shorter tails; a tail that two names or two paths share
    matches nothing at that length, and a path matched once is not matched again. A name still unmatched whose
    file name carries Label Studio's upload prefix (:data:`UPLOAD_PREFIX`: ``1a2b3c4d-photo.jpg`` for an
    uploaded ``photo.jpg``) is tried again without it, against the paths left."""
    names = [name_parts(n) for n in file_names]
    files = [name_parts(p) for p in paths]
    matched = _match_tails(dict(enumerate(names)), files, set())
    uploaded = {i: parts[:-1] + (found.group(1),) for i, parts in enumerate(names)
                if i not in matched and parts and (found := UPLOAD_PREFIX.fullmatch(parts[-1]))}
    return {**matched, **_match_tails(uploaded, files, set(matched.values()))}


def keyed_by_names(by_file_name: Mapping[str, T], names: Sequence[str]) -> dict[str, T]:
    """``by_file_name`` (values under another tool's file names, e.g. a COCO truth's image ids) under the ``names``
    each file name matches (:func:`match_files`); file names that match none are left out."""
    file_names = list(by_file_name)
    return {names[j]: by_file_name[file_names[i]] for i, j in match_files(file_names, names).items()}


def _match_tails(names: dict[int, tuple[str, ...]], files: list[tuple[str, ...]], claimed: set[int]) -> dict[int, int]:
    """:func:`match_files`' rule: ``names`` (index -> parts) to the ``files`` not yet ``claimed``."""
    matched: dict[int, int] = {}
    for k in range(max(map(len, names.values()), default=0), 0, -1):
        tails: dict[tuple[str, ...], list[int]] = {}
        for j, parts in enumerate(files):
            if j not in claimed and len(parts) >= k:
                tails.setdefault(parts[-k:], []).append(j)
        wanted: dict[tuple[str, ...], list[int]] = {}
        for i, parts in names.items():
            if i not in matched and len(parts) >= k:
                wanted.setdefault(parts[-k:], []).append(i)
        for tail, (i, *others) in wanted.items():
            if not others and len(tails.get(tail, ())) == 1:
                matched[i] = tails[tail][0]
                claimed.add(tails[tail][0])
    return matched


def name_parts(name: str) -> tuple[str, ...]:
    """A file name or path as its parts (``/`` or ``\\`` separated; empty and ``.`` parts dropped)."""
    return tuple(p for p in str(name).replace("\\", "/").split("/") if p not in ("", "."))
