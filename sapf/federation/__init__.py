"""Federated DP-SAPF (and the harness's other methods) with Flower: the server and the sites, in simulation and in
deployment.

Reading order, following `sapf federate --clients 4` to its ONNX file:

1. :mod:`sapf.cli` ``federate`` builds a :class:`sapf.config.FederationConfig` (the plan) from its options.
2. :mod:`sapf.federation.simulation` makes the run dir and starts Flower's simulation (Ray) with
3. :mod:`sapf.federation.server_app` — runs the stages of :func:`sapf.engine.stages.stages_of`: each query
   round (each site's noisy sum, combined by :mod:`sapf.federation.combine`), then rounds of local DP-SGD
   whose adapters are combined; writes ``model/``, ``README.md`` and exports ``model.onnx``
   (:mod:`sapf.export.onnx_export`);
4. :mod:`sapf.federation.client_app` — a site: checks the plan (:mod:`sapf.federation.site_policy`),
   records each release in its lifetime ledger, then answers with engine calls;
5. :mod:`sapf.federation.task` — code both sides share: site data, noise plan, ledgers, the wire format.

Deployment (`sapf serve` / `sapf join`): :mod:`sapf.federation.deployment` starts a SuperLink behind
:mod:`sapf.federation.fleet_gate` and SuperNodes guarded by :mod:`sapf.federation.app_guard`;
:mod:`sapf.federation.credentials` makes the TLS certificates and site keys (`sapf certs`).

Contracts that no type checks, kept here in one place:

- **Messages.** Server → site: the queries ``query.central_images``, ``query.saliency``, ``query.sparta_mask`` and
  ``query.mean_embeddings`` with ``config`` (the plan, :meth:`FederationConfig.to_record`; after a warm-up also
  ``base``, the warmed weights; ``query.mean_embeddings`` (a dp-mepf plan, or a ``mean-embeddings`` warm-up) also
  ``features``, the public feature network's weights); ``train`` with
  ``config`` (the plan + ``round``, + ``selected`` for a saliency plan, + ``rows``, JSON, for a SPARTA plan) and
  ``adapter`` (float16 tensors, :func:`task.to_wire`: LoRA, or the trained weights). Site → server: ``sums`` or
  ``scores`` (a noisy vector) or ``adapter``, ``metrics`` (``examples``, ``epsilon``, and ``noise_multiplier`` for a
  query) and ``privacy`` (``site``, ``report``: the site's ledger as JSON). Nothing else travels.
- **Run dir files.** ``config.json`` (the plan), ``status.json`` (``status``: completed | failed, ``error``,
  ``site_epsilon``: what `sapf federate`/`serve` read, since Flower reports a failed ServerApp as finished),
  ``checkpoint/`` (``state.json`` written last), ``privacy/site-<node id>.json``, ``selection.json``,
  ``metrics.json``, ``README.md`` (model card).
- **Node config keys** (`sapf join` → SuperNode): ``data-path``, ``max-epsilon``, ``delta``, ``state-dir``,
  ``base-models`` (newline-separated), ``limits`` (``max-rank=16,...``); simulation: ``partition-id``,
  ``num-partitions``.
- **Environment.** ``SAPF_SITE_THREADS`` (torch threads per site, default 1), ``SAPF_CACHE`` (evaluation
  networks), ``FLWR_HOME`` (a site's own Flower home under its state dir); `sapf join` puts ``STATE/bin`` first
  on ``PATH`` (the app guard's ``flwr-clientapp``).
"""
