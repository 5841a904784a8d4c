"""Multi-agent sites on the device side: site topics, coordination messages and the site agent
(``docs/multi-agent.md``)."""

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
from cogbert_edge.site.messages import AgentMessage, Decision
from cogbert_edge.site.topics import SITE_KINDS, SITE_ROLES, check_site, parse_site_topic, site_filter, site_topic

__all__ = ["IDLE", "MAINTAIN", "SITE_KINDS", "SITE_ROLES", "WORK", "AgentMessage", "Decision", "SiteAgent",
           "SiteAgentSettings", "StepResult", "actor_input", "check_site", "parse_site_topic", "resolve_claims",
           "site_filter", "site_topic"]
