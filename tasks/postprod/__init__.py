"""Post-production: what turns a model's raw frames into a clip a brand can publish.

Each stage is a function over uint8 RGB frames ``(frames, height, width, 3)`` (or over
the encoded file, for provenance) that returns its result and a :class:`StageReport`
for the manifest. The stages know nothing of Ray, Prefect or the object store.
"""
