"""Datasets the controller trains on: local files read with `datasets`, never downloaded."""

from kubeforge.data.files import load_table, split_files
from kubeforge.data.gsm8k import Example, Splits, held_out_split, load_gsm8k, load_splits

__all__ = ["Example", "Splits", "held_out_split", "load_gsm8k", "load_splits", "load_table", "split_files"]
