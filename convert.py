"""Pure conversions between the client APIs and Kiro's CodeWhisperer backend.

Request side: an Anthropic Messages body (OpenAI bodies are first normalised
to that shape) becomes one ``generateAssistantResponse`` payload.

Response side: each decoded event-stream ``Message`` becomes neutral events,
which one renderer per wire format turns into Anthropic SSE or OpenAI chunks;
the non-streaming answers fold the same events.

Standard library only: no I/O, no logging, no clock or random ids of its own
(callers pass them in), so every function here is testable without a loop.
"""

from __future__ import annotations
