"""The progress protocol the verbs share (loradeploy.progress)."""

from loradeploy.progress import begin, quiet, steps


class _Recorder:
    def __init__(self):
        self.seen = []

    def begin(self, message):
        self.seen.append(("begin", message))

    def __call__(self, message):
        self.seen.append(("done", message))


def test_begin_reaches_a_step_that_can_show_it_and_skips_one_that_cannot():
    step = _Recorder()
    begin(step, "reading")
    step("read")
    assert step.seen == [("begin", "reading"), ("done", "read")]
    plain = []
    begin(plain.append, "reading")  # a plain callable has no begin: nothing is reported
    assert plain == []


def test_steps_keeps_a_given_step_and_stands_in_quiet_for_none():
    step = _Recorder()
    assert steps(step) is step
    assert steps(None) is quiet
    assert quiet("anything") is None
