from cleansweep.cli import entrypoint

entrypoint()
