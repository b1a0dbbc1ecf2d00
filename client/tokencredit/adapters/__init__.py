"""Trainer adapters: `tokencredit.adapters.trl`, `.openrlhf`, `.verl`.

Each module imports its trainer lazily (only when a trainer-specific class is first used), so importing an
adapter never needs the trainer, torch or a GPU stack; the tensor-layout helpers are pure torch functions.
"""


def lazy_classes(module_name: str, module_globals: dict, builders: dict):
    """A module `__getattr__` that builds trainer-specific classes on first access and caches them.

    Trainers load our classes by name (`getattr(module, "AgentExecutor")`); building them only then keeps the
    scalar tiers and the layout helpers importable without the trainer installed.
    """

    def __getattr__(name: str):
        if name in builders:
            cls = builders[name]()
            module_globals[name] = cls
            return cls
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
