"""An SDK pointed at keybroker's root instead of its proxy (issue 20, item 4): the call gets
an answer in the provider's error shape that says where the proxy is, not an HTML 404."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

# The first segment after /v1/ of the calls Anthropic's and OpenAI's SDKs make; none of
# them is a path of keybroker's own API.
SDK_SEGMENTS = (
    "messages", "complete", "models", "chat", "responses", "embeddings", "completions",
    "files", "batches", "audio", "images", "moderations",
)  # fmt: skip
SDK_PATHS = rf"^v1/(?:{'|'.join(SDK_SEGMENTS)})(?:/.*)?$"


@csrf_exempt
def sdk_call_at_root(request: HttpRequest) -> JsonResponse:
    proxy = f"{settings.PUBLIC_URL}/v1/proxy/BACKEND"
    message = (
        f"{request.path} is not keybroker's proxy: set the SDK's base URL to {proxy} "
        f"(OpenAI's SDKs: {proxy}/v1), with a crd_ token as its key; `keybroker env BACKEND` "
        "prints both"
    )
    # Anthropic's shape; OpenAI's SDKs read error.message from it as well.
    body = {"type": "error", "error": {"type": "not_found_error", "message": message}}
    return JsonResponse(body, status=404)
