"""Publishing to the Hugging Face Hub: `push` uploads a verified checkpoint and its generated card in one commit."""

from qformat.hub.push import HubError, PushResult, push

__all__ = ["HubError", "PushResult", "push"]
