"""Labelled datasets: image folders, the synthetic generator, the torch dataset, evaluation composites."""

from slip.data.composites import Composite, CompositeSource, OracleSegments, oracle_segments
from slip.data.dataset import CaptionDataset, maskset_from_masks
from slip.data.folder import ImageRecord, LabelledFolder, scan_folder, split_records
from slip.data.synth import CLASS_NAMES, generate_dataset, render_object, render_scene

__all__ = [
    "CLASS_NAMES",
    "CaptionDataset",
    "Composite",
    "CompositeSource",
    "ImageRecord",
    "LabelledFolder",
    "OracleSegments",
    "generate_dataset",
    "maskset_from_masks",
    "oracle_segments",
    "render_object",
    "render_scene",
    "scan_folder",
    "split_records",
]
