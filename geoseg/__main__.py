from geoseg.cli import entrypoint

entrypoint()
