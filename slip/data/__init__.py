"""Labelled datasets: image folders, the synthetic generator and evaluation composites."""
