"""Deterministic simulation of a kvstore cluster."""
