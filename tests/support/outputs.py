"""What an exported artifact computes, read back through the runtime as a user would open it."""

from __future__ import annotations


def artifact_outputs(artifact, adapter, texts):
    """The outputs of ``artifact`` (with ``adapter`` active; None: the base or merged model) on
    ``texts``, tokenized by the artifact's own tokenizer."""
    from loradeploy import runtime
    from loradeploy.base import load_tokenizer
    from loradeploy.validate import session_outputs

    with runtime.open(artifact) as session:
        return session_outputs(session, adapter, load_tokenizer(artifact), texts)
