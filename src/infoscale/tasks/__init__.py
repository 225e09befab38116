"""Objectives: each module gives training batches and scoring for one kind of model."""
