def random_uuid():
    raise NotImplementedError("vLLM stand-in: not callable on CPU (see tests/trainer_envs/cuda_stubs/README.md)")
