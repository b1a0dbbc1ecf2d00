"""Trainer adapters: `tokencredit.adapters.trl`, `.openrlhf`, `.verl`.

Each module imports its trainer lazily (only when a trainer-specific class is first used), so importing an
adapter never needs the trainer, torch or a GPU stack; the tensor-layout helpers are pure torch functions.
"""
