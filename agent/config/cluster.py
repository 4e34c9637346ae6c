"""The cluster's settings: the node side that follows a list, and ``cluster serve``."""

from __future__ import annotations

import dataclasses

from agent.config.fields import setting


@dataclasses.dataclass(frozen=True)
class ClusterAgentConfig:
    cluster_url: str = setting(
        "",
        flag="--cluster-url",
        env="IMAGE_AGENT_CLUSTER_URL",
        help="image-agent cluster serve to follow for the image list",
    )
    cluster_token_file: str = setting(
        "",
        flag="--cluster-token-file",
        env="IMAGE_AGENT_CLUSTER_TOKEN_FILE",
        help="file holding this node's token (image-agent cluster token NODE) or the shared one",
    )
    cluster_ca_file: str = setting(
        "",
        flag="--cluster-ca-file",
        env="IMAGE_AGENT_CLUSTER_CA_FILE",
        help="CA certificate(s) to trust for an https --cluster-url (default: the system's)",
    )
    node_name: str = setting(
        "", flag="--node-name", env="NODE_NAME", help="this node's name (default: hostname)"
    )
    node_labels: str = setting(
        "",
        flag="--node-labels",
        env="IMAGE_AGENT_NODE_LABELS",
        help="this node's labels, k=v[,k=v], matched against source node selectors",
    )
    report_interval_s: float = setting(
        120.0,
        flag="--report-interval",
        env="IMAGE_AGENT_REPORT_INTERVAL",
        unit="s",
        help="status goes to the cluster when it changes and at least this often",
    )
    min_poll_s: float = setting(
        10.0,
        flag="--cluster-min-poll",
        env="IMAGE_AGENT_CLUSTER_MIN_POLL",
        unit="s",
        help="never ask for the list again sooner than this after the last ask, "
        "whatever the server answers",
    )


@dataclasses.dataclass(frozen=True)
class ClusterServeConfig:
    listen: str = setting(
        "0.0.0.0:8080", flag="--listen", env="IMAGE_AGENT_CLUSTER_LISTEN", help="HOST:PORT"
    )
    source_images: tuple[str, ...] = setting(
        (),
        flag="--source-images",
        env="IMAGE_AGENT_CLUSTER_SOURCE_IMAGES",
        lines=True,
        help="Image Puller IMAGES string, or @FILE (repeatable; env: one a line)",
    )
    source_cr: tuple[str, ...] = setting(
        (),
        flag="--source-cr",
        env="IMAGE_AGENT_CLUSTER_SOURCE_CR",
        lines=True,
        help="KubernetesImagePuller resource, a YAML file (repeatable; env: one a line)",
    )
    source_list: tuple[str, ...] = setting(
        (),
        flag="--source-list",
        env="IMAGE_AGENT_CLUSTER_SOURCE_LIST",
        lines=True,
        help="list file or URL, one image a line (repeatable; env: one a line)",
    )
    source_che: tuple[str, ...] = setting(
        (),
        flag="--source-che",
        env="IMAGE_AGENT_CLUSTER_SOURCE_CHE",
        lines=True,
        help="Che base URL (dashboard editors and air-gap samples) (repeatable; env: one a line)",
    )
    source_env: tuple[str, ...] = setting(
        (),
        flag="--source-env",
        env="IMAGE_AGENT_CLUSTER_SOURCE_ENV",
        lines=True,
        help="file of RELATED_IMAGE_* variables (repeatable; env: one a line)",
    )
    source_interval_s: float = setting(
        60.0,
        flag="--source-interval",
        env="IMAGE_AGENT_CLUSTER_SOURCE_INTERVAL",
        unit="s",
        help="re-read URL sources this often (files: when they change)",
    )
    rewrite: tuple[str, ...] = setting(
        (),
        flag="--rewrite",
        env="IMAGE_AGENT_CLUSTER_REWRITE",
        help="FROM=TO: map a registry onto a mirror (repeatable)",
    )
    token_file: str = setting(
        "",
        flag="--token-file",
        env="IMAGE_AGENT_CLUSTER_TOKEN_FILE",
        help="shared bearer token: every read; writes only while no node secret is set",
    )
    node_secret_file: str = setting(
        "",
        flag="--node-secret-file",
        env="IMAGE_AGENT_CLUSTER_NODE_SECRET_FILE",
        help="secret that node tokens are derived from (image-agent cluster token NODE)",
    )
    auth_reads: bool = setting(
        False,
        flag="--auth-reads",
        env="IMAGE_AGENT_CLUSTER_AUTH_READS",
        help="require a token for reads too (true/false)",
    )
    tls_cert: str = setting(
        "", flag="--tls-cert", env="IMAGE_AGENT_CLUSTER_TLS_CERT", help="serve HTTPS: certificate"
    )
    tls_key: str = setting(
        "", flag="--tls-key", env="IMAGE_AGENT_CLUSTER_TLS_KEY", help="serve HTTPS: its key"
    )
    max_connections: int = setting(
        10_000,
        flag="--max-connections",
        env="IMAGE_AGENT_CLUSTER_MAX_CONNECTIONS",
        help="open connections at most (lowered to fit the file limit)",
    )
    max_long_polls: int = setting(
        8_000,
        flag="--max-long-polls",
        env="IMAGE_AGENT_CLUSTER_MAX_LONG_POLLS",
        help="requests held waiting for a change at once; more are answered at once",
    )
    header_timeout_s: float = setting(
        15.0,
        flag="--header-timeout",
        env="IMAGE_AGENT_CLUSTER_HEADER_TIMEOUT",
        unit="s",
        help="a connection must send its request headers within this (also the idle time)",
    )
    body_timeout_s: float = setting(
        30.0,
        flag="--body-timeout",
        env="IMAGE_AGENT_CLUSTER_BODY_TIMEOUT",
        unit="s",
        help="a report's body must arrive within this",
    )
    stale_after_s: float = setting(
        900.0,
        flag="--stale-after",
        env="IMAGE_AGENT_CLUSTER_STALE_AFTER",
        unit="s",
        help="a node not heard from this long shows as stale",
    )
    forget_after_s: float = setting(
        86_400.0,
        flag="--forget-after",
        env="IMAGE_AGENT_CLUSTER_FORGET_AFTER",
        unit="s",
        help="a node not heard from this long leaves the view",
    )
