"""The broker feed to SkyPortal/Fritz: `stage` (the pipeline's hand-off: what each batch posts,
per survey set-up), `outbox` (the entries waiting, per object), `delivery` (the thread that
drains the outbox, looking before writing after a crash), `client` (SkyPortal's HTTP API) and
`photometry` (alerts to SkyPortal's photometry)."""
