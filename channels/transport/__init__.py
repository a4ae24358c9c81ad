"""The transport both sides share: the HTTP/1.1 client the HTTP channel and the SQS client send
with, and capped exponential backoff. Nothing here knows about SQS or CloudEvents."""
