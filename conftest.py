"""Fixtures every test file gets: one thread for the tiny models, and pytest's own signal handlers back after a
stage installed its stop-signal handlers."""
import signal

import pytest
import torch

import utils


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """The stages install handlers for the stop signals; give pytest its own back."""
    saved = {name: signal.getsignal(getattr(signal, name)) for name in utils.STOP_SIGNALS}
    yield
    for name, handler in saved.items():
        signal.signal(getattr(signal, name), handler)
