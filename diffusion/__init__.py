"""Diffusion sampling above the API: DiT and PixArt pipelines whose denoising step is one kiln graph replayed per
step (``pipelines.py``, ``dit.py``, ``pixart.py``), schedulers as replayable tensor math (``schedulers.py``)."""
from ..errors import ArtifactError
from .dit import DiTPipeline
from .pipelines import Pipeline, PipelineOutput, read_manifest
from .pixart import PixArtPipeline


def load(path, device=None, backend=None) -> Pipeline:
    """A pipeline artifact (``Pipeline.save``, ``kiln compile --pipeline``) as the pipeline class it was saved from."""
    kind = read_manifest(path)["pipeline"].get("kind")
    classes = {c.KIND: c for c in (DiTPipeline, PixArtPipeline)}
    if kind not in classes:
        raise ArtifactError(f"{path}: check 'pipeline' failed: unknown pipeline kind {kind!r} (kiln knows {', '.join(classes)})")
    return classes[kind].load(path, device=device, backend=backend)


__all__ = ["DiTPipeline", "PixArtPipeline", "Pipeline", "PipelineOutput", "load"]
