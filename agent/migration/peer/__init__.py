"""Agent to agent: what a source agent sends a destination agent (``wire``: the incoming migration's spec and
the destination's answers), the one client that speaks to it (``client.DestinationAgent``), and the sender of
a chain's layers (``layers``). The source's engines (``crosshost``, ``offline``) and the destination's
service (``incoming``) all import it; none of them imports another."""
