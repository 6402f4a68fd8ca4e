"""The build folder's format: its layout (folder.py), each artifact's artifact.json (description.py), the GPU an
engine is for (gpu.py), and what `inspect` prints (describe.py). Read by the runners, validate and deploy;
written by the pipeline and the engine makers."""
