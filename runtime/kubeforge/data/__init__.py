"""Datasets the controller trains on: local files read with `datasets`, never downloaded."""

from kubeforge.data.gsm8k import Example, Splits, held_out_split, load_gsm8k, load_splits

__all__ = ["Example", "Splits", "held_out_split", "load_gsm8k", "load_splits"]
