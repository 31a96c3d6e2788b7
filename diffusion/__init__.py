"""Diffusion sampling above the API: schedulers as replayable tensor math (``schedulers.py``)."""
