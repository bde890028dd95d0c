"""fastdqn.signals.handling: a handler for the length of a block, in the main thread only."""

import signal
import threading

from fastdqn.signals import handling


def mine(signum, frame):
    pass


def test_the_handler_is_in_place_for_the_block_then_the_previous_one_again():
    before = signal.getsignal(signal.SIGTERM)
    with handling(signal.SIGTERM, mine):
        assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_callers_ctrl_c_handler_stays_and_other_threads_install_nothing():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job
    try:
        with handling(signal.SIGINT, mine, over_ctrl_c_default=True):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    with handling(signal.SIGINT, mine, over_ctrl_c_default=True):
        assert signal.getsignal(signal.SIGINT) is mine
    seen = []

    def in_a_thread():
        with handling(signal.SIGTERM, mine):  # signal.signal would raise ValueError here
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen and seen[0] is not mine
