"""Multi-agent sites on the device side: the site agent, with the site topics and coordination
messages it uses (defined with the rest of the contract in :mod:`cogbert_edge.wire`;
``docs/multi-agent.md``)."""

from cogbert_edge.site.agent import (
    IDLE,
    MAINTAIN,
    WORK,
    SiteAgent,
    SiteAgentSettings,
    StepResult,
    actor_input,
    resolve_claims,
)
from cogbert_edge.wire.messages import AgentMessage, SiteDecision
from cogbert_edge.wire.topics import SITE_KINDS, SITE_ROLES, check_site, parse_site_topic, site_filter, site_topic

__all__ = ["IDLE", "MAINTAIN", "SITE_KINDS", "SITE_ROLES", "WORK", "AgentMessage", "SiteDecision", "SiteAgent",
           "SiteAgentSettings", "StepResult", "actor_input", "check_site", "parse_site_topic", "resolve_claims",
           "site_filter", "site_topic"]
