/*
 * cogbert_acl: the access policy of a Cogbert fleet, as a Mosquitto 2.0 plugin.
 *
 * Which listener a client may use is settled by TLS before this plugin runs: the device
 * listener trusts only the fleet CA (which issues device certificates), the service listener
 * only the services CA, so a certificate of the other role fails the handshake. This plugin
 * adds what certificates and an acl_file cannot:
 *
 *  - Devices (device listener: use_identity_as_username and use_username_as_clientid, so the
 *    username and the client id are the certificate's CN and nobody can take over another
 *    device's session). A device D of fleet F (the certificate's OU) may publish only
 *    PREFIX/F/D/{exp,telemetry,status}, and subscribe to and receive only PREFIX/F/D/{ack,release}
 *    and PREFIX/F/release; no wildcards. Everything else is denied here (Mosquitto 2.0's
 *    acl_file grants every subscription and filters on delivery, and its %u patterns cannot
 *    bind a fleet).
 *  - Services (service listener: use_identity_as_username is off, so that Mosquitto asks this
 *    plugin at CONNECT). The CN must be "svc:NAME" and the client id NAME or "NAME-SUFFIX"
 *    (replicas of one service choose distinct suffixes; no client can take over another
 *    service's session); the username becomes the CN, whatever the client sent. Their topics
 *    come from the acl_file (one block per service identity, by role): the plugin defers.
 *  - Sites (multi-agent sites): a device certificate may name a site (subject L) and a site role
 *    (subject title: "agent" or "coordinator"). A member M of site S of fleet F may publish
 *    PREFIX/F/_site/S/M/msg, the coordinator also PREFIX/F/_site/S/M/decision, and members of S
 *    may subscribe to PREFIX/F/_site/S/{+ or a member}/{msg,decision} and receive S's messages.
 *    Nobody outside S may do any of it; "_site" is no valid device id, so it cannot collide.
 *  - A name listed in the revoked file is refused everything and kicked off the broker within
 *    about a second of the file changing (Mosquitto checks the CRL only at connect time).
 *
 * Options: plugin_opt_prefix (default "cogbert/v1"), plugin_opt_revoked_file (optional; one name
 * a line, written by `cogbert pki revoke`).
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/objects.h>
#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_LEVEL 128
#define MAX_NAME 64          /* device ids and fleet names: 1-64 of [A-Za-z0-9_-] */

struct policy {
	mosquitto_plugin_id_t *id;
	char prefix[256];
	char revoked_path[4096];
	char *revoked;          /* "\nname1\nname2\n", or NULL */
	time_t revoked_mtime;
	long revoked_size;
	time_t last_check;
};

/* A device id or fleet name: 1-64 of letters, digits, '-', '_', starting with a letter or digit. */
static bool valid_name(const char *s)
{
	size_t n = 0;
	if (!s || !*s) return false;
	if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9'))) return false;
	for (; s[n]; n++) {
		char c = s[n];
		if (n >= MAX_NAME) return false;
		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
			return false;
	}
	return true;
}

/* One topic level: non-empty, at most MAX_LEVEL bytes, no '/'. Wildcards are checked apart. */
static bool next_level(const char **p, char *out)
{
	size_t n = 0;
	while (**p && **p != '/') {
		if (n >= MAX_LEVEL) return false;
		out[n++] = *(*p)++;
	}
	out[n] = '\0';
	if (**p == '/') (*p)++;
	return n > 0;
}

static bool has_wildcard(const char *s)
{
	return strchr(s, '+') != NULL || strchr(s, '#') != NULL;
}

static bool is_revoked(const struct policy *pol, const char *username)
{
	size_t n;
	const char *hit;
	if (!pol->revoked) return false;
	n = strlen(username);
	for (hit = strstr(pol->revoked, username); hit; hit = strstr(hit + 1, username)) {
		if (hit > pol->revoked && hit[-1] == '\n' && hit[n] == '\n') return true;
	}
	return false;
}

/* Whether device `dev` of fleet `fleet` may do `access` on `topic`. */
static bool site_allowed(const char *dev, const char *site, const char *role, int access, const char *p);

static bool device_allowed(const struct policy *pol, const char *dev, const char *fleet, const char *site,
                           const char *role, int access, const char *topic)
{
	size_t plen = strlen(pol->prefix);
	const char *p;
	char f[MAX_LEVEL + 1], d[MAX_LEVEL + 1], kind[MAX_LEVEL + 1];

	if (!topic || strchr(topic, '#') != NULL) return false;
	if (strncmp(topic, pol->prefix, plen) != 0 || topic[plen] != '/') return false;
	p = topic + plen + 1;
	if (!next_level(&p, f) || strcmp(f, fleet) != 0 || !next_level(&p, d)) return false;
	if (strcmp(d, "_site") == 0) {
		/* '+' is allowed in exactly one place: the member level of a subscription (site_allowed). */
		const char *q = p, *plus = strchr(p, '+');
		if (plus) {
			const char *slash = strchr(q, '/');
			if (!slash || plus != slash + 1 || strchr(plus + 1, '+') || plus[1] != '/') return false;
		}
		return site_allowed(dev, site, role, access, p);
	}
	if (has_wildcard(topic)) return false;
	if (*p == '\0') {       /* PREFIX/F/release: the fleet's retained release */
		return strcmp(d, "release") == 0 && access != MOSQ_ACL_WRITE;
	}
	if (strcmp(d, dev) != 0 || !next_level(&p, kind) || *p != '\0') return false;
	if (access == MOSQ_ACL_WRITE) {
		return !strcmp(kind, "exp") || !strcmp(kind, "telemetry") || !strcmp(kind, "status");
	}
	return !strcmp(kind, "ack") || !strcmp(kind, "release");   /* subscribe, read */
}

/* Whether member `dev` of site `site` (role `role`, "" if none) of fleet `fleet` may do `access` on a
 * site topic; `p` points after PREFIX/F/_site/. */
static bool site_allowed(const char *dev, const char *site, const char *role, int access, const char *p)
{
	char s[MAX_LEVEL + 1], m[MAX_LEVEL + 1], kind[MAX_LEVEL + 1];
	bool is_msg, is_decision;

	if (!site[0] || !next_level(&p, s) || strcmp(s, site) != 0) return false;
	if (!next_level(&p, m) || !next_level(&p, kind) || *p != '\0') return false;
	is_msg = strcmp(kind, "msg") == 0;
	is_decision = strcmp(kind, "decision") == 0;
	if (!is_msg && !is_decision) return false;
	if (access == MOSQ_ACL_WRITE) {
		if (strcmp(m, dev) != 0) return false;
		return is_msg ? (!strcmp(role, "agent") || !strcmp(role, "coordinator")) : !strcmp(role, "coordinator");
	}
	if (access == MOSQ_ACL_SUBSCRIBE && strcmp(m, "+") == 0) return true;   /* every member's, one level */
	return valid_name(m);
}

/* The value of the certificate subject's entry `nid`, into out; false when absent or too long. */
static bool subject_entry(X509 *cert, int nid, char *out, int size)
{
	X509_NAME *name = X509_get_subject_name(cert);
	int len;
	if (!name || X509_NAME_entry_count(name) <= 0) return false;
	len = X509_NAME_get_text_by_NID(name, nid, out, size);
	return len > 0 && len < size - 1;
}

static int refuse(const char *client_id, const char *why, const char *who)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "cogbert_acl: refused client %s (%s): %s",
	                     client_id ? client_id : "(none)", who ? who : "?", why);
	return MOSQ_ERR_AUTH;
}

/* BASIC_AUTH runs only on the service listener (the device listener takes its identity from the
 * certificate, use_identity_as_username, and Mosquitto then skips authentication plugins). */
static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	struct policy *pol = userdata;
	const char *client_id = mosquitto_client_id(ed->client);
	const char *name;
	char cn[160];
	size_t n;
	X509 *cert;
	(void)event;

	cert = mosquitto_client_certificate(ed->client);
	if (!cert) return refuse(client_id, "no client certificate", NULL);
	if (!subject_entry(cert, NID_commonName, cn, sizeof(cn))) {
		X509_free(cert);
		return refuse(client_id, "certificate has no usable common name", NULL);
	}
	X509_free(cert);
	name = cn + 4;
	n = strlen(name);
	if (strncmp(cn, "svc:", 4) != 0 || !valid_name(name)) {
		return refuse(client_id, "not a service identity", cn);
	}
	if (!client_id || strncmp(client_id, name, n) != 0 || (client_id[n] != '\0' && client_id[n] != '-')) {
		return refuse(client_id, "a service's client id must be its name or NAME-SUFFIX", cn);
	}
	if (is_revoked(pol, cn)) return refuse(client_id, "identity is revoked", cn);
	if (mosquitto_set_username(ed->client, cn) != MOSQ_ERR_SUCCESS) {
		return refuse(client_id, "could not set the username", cn);
	}
	return MOSQ_ERR_SUCCESS;
}

/* The fleet of a device connection (its certificate's OU) and, when the certificate names them,
 * its site (L) and site role (title); site and role are "" otherwise. */
static bool device_fleet(struct mosquitto *client, char *fleet, int size, char *site, char *role, int rsize)
{
	X509 *cert = mosquitto_client_certificate(client);
	bool ok;
	site[0] = role[0] = '\0';
	if (!cert) return false;
	ok = subject_entry(cert, NID_organizationalUnitName, fleet, size) && valid_name(fleet);
	if (ok && subject_entry(cert, NID_localityName, site, size)) {
		if (!valid_name(site) || !subject_entry(cert, NID_title, role, rsize)) site[0] = role[0] = '\0';
	}
	X509_free(cert);
	return ok;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	struct policy *pol = userdata;
	const char *username = mosquitto_client_username(ed->client);
	char fleet[160], site[160], role[32];
	(void)event;

	if (!username || !*username || is_revoked(pol, username)) return MOSQ_ERR_ACL_DENIED;
	if (strncmp(username, "svc:", 4) == 0) return MOSQ_ERR_PLUGIN_DEFER;   /* the acl_file's roles */
	if (!valid_name(username) || !device_fleet(ed->client, fleet, sizeof(fleet), site, role, sizeof(role)))
		return MOSQ_ERR_ACL_DENIED;
	return device_allowed(pol, username, fleet, site, role, ed->access, ed->topic) ? MOSQ_ERR_SUCCESS
	                                                                               : MOSQ_ERR_ACL_DENIED;
}

static void load_revoked(struct policy *pol)
{
	struct stat st;
	FILE *f;
	char *buf;
	char *line;
	size_t got;

	if (!pol->revoked_path[0] || stat(pol->revoked_path, &st) != 0) return;
	if (st.st_mtime == pol->revoked_mtime && (long)st.st_size == pol->revoked_size) return;
	if (st.st_size > (1 << 24)) {
		mosquitto_log_printf(MOSQ_LOG_ERR, "cogbert_acl: %s is too large", pol->revoked_path);
		return;
	}
	f = fopen(pol->revoked_path, "rb");
	if (!f) return;
	buf = malloc((size_t)st.st_size + 3);
	if (!buf) {
		fclose(f);
		return;
	}
	buf[0] = '\n';
	got = fread(buf + 1, 1, (size_t)st.st_size, f);
	fclose(f);
	buf[got + 1] = '\n';
	buf[got + 2] = '\0';
	free(pol->revoked);
	pol->revoked = buf;
	pol->revoked_mtime = st.st_mtime;
	pol->revoked_size = (long)st.st_size;

	/* Drop the live sessions of every revoked name: Mosquitto never re-checks a CRL for them. */
	for (line = buf + 1; *line; ) {
		char *end = strchr(line, '\n');
		if (!end) break;
		*end = '\0';
		if (*line) {
			mosquitto_kick_client_by_username(line, false);
			mosquitto_log_printf(MOSQ_LOG_NOTICE, "cogbert_acl: revoked identity %s refused and disconnected", line);
		}
		*end = '\n';
		line = end + 1;
	}
}

static int on_tick(int event, void *event_data, void *userdata)
{
	struct policy *pol = userdata;
	time_t now = time(NULL);
	(void)event;
	(void)event_data;
	if (now != pol->last_check) {
		pol->last_check = now;
		load_revoked(pol);
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for (i = 0; i < supported_version_count; i++) {
		if (supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
                          struct mosquitto_opt *options, int option_count)
{
	int i, rc;
	struct policy *pol = calloc(1, sizeof(*pol));
	if (!pol) return MOSQ_ERR_NOMEM;
	strcpy(pol->prefix, "cogbert/v1");
	for (i = 0; i < option_count; i++) {
		if (!strcmp(options[i].key, "prefix") && strlen(options[i].value) < sizeof(pol->prefix)) {
			strcpy(pol->prefix, options[i].value);
		} else if (!strcmp(options[i].key, "revoked_file") &&
		           strlen(options[i].value) < sizeof(pol->revoked_path)) {
			strcpy(pol->revoked_path, options[i].value);
		}
	}
	pol->id = identifier;
	*userdata = pol;
	load_revoked(pol);
	rc = mosquitto_callback_register(pol->id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, pol);
	if (rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(pol->id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, pol);
	if (rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(pol->id, MOSQ_EVT_TICK, on_tick, NULL, pol);
	return rc;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct policy *pol = userdata;
	(void)options;
	(void)option_count;
	if (!pol) return MOSQ_ERR_SUCCESS;
	mosquitto_callback_unregister(pol->id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(pol->id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(pol->id, MOSQ_EVT_TICK, on_tick, NULL);
	free(pol->revoked);
	free(pol);
	return MOSQ_ERR_SUCCESS;
}
