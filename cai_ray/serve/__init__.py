"""Serving: the policy (OpenAI-compatible chat), the AI labeler and the guardrail over HTTP."""
