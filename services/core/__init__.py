"""Code every service shares: arguments, the Sample type, wire models, HTTP/gRPC plumbing, Redis helpers."""
