/*
 * cogbert_acl: the device access policy of a Cogbert fleet, as a Mosquitto 2.0 plugin.
 *
 * The broker's acl_file (`pattern` lines on %u for devices, `user` blocks for services) decides
 * publishes and deliveries. Two things it cannot do, this plugin adds:
 *
 *  - refuse a SUBSCRIBE. Mosquitto 2.0's acl_file grants every subscription and filters on
 *    delivery, so a device that subscribes to another device's topic would be told "granted"
 *    and then silently receive nothing. Here device U (certificate CN, through
 *    use_identity_as_username) may subscribe only to PREFIX/F/U/ack, PREFIX/F/U/release and
 *    PREFIX/F/release, with F a literal fleet name (no wildcards anywhere); anything else gets
 *    SUBACK "not authorized".
 *  - drop a revoked identity. Mosquitto checks the CRL only at connect time. A name listed in
 *    the revoked file is refused everything and kicked off the broker within about a second
 *    of the file changing.
 *
 * For everything else, and for every service identity (CN "svc:NAME"), the plugin defers and
 * the acl_file decides.
 *
 * Options: plugin_opt_prefix (default "cogbert/v1"), plugin_opt_revoked_file (optional; one
 * name per line, written by `cogbert pki revoke`).
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_LEVEL 128

struct policy {
	char prefix[256];
	char revoked_path[4096];
	char *revoked;          /* "\nname1\nname2\n", or NULL */
	time_t revoked_mtime;
	long revoked_size;
	time_t last_check;
};

static mosquitto_plugin_id_t *plugin_id;
static struct policy policy;

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

static bool is_revoked(const char *username)
{
	size_t n;
	const char *hit;
	if (!policy.revoked) return false;
	n = strlen(username);
	for (hit = strstr(policy.revoked, username); hit; hit = strstr(hit + 1, username)) {
		if (hit > policy.revoked && hit[-1] == '\n' && hit[n] == '\n') return true;
	}
	return false;
}

/* Whether device `username` may subscribe to `filter`. */
static bool subscription_allowed(const char *username, const char *filter)
{
	size_t plen = strlen(policy.prefix);
	const char *p;
	char fleet[MAX_LEVEL + 1], dev[MAX_LEVEL + 1], kind[MAX_LEVEL + 1];

	if (has_wildcard(filter)) return false;
	if (strncmp(filter, policy.prefix, plen) != 0 || filter[plen] != '/') return false;
	p = filter + plen + 1;
	if (!next_level(&p, fleet) || !next_level(&p, dev)) return false;
	if (*p == '\0') return strcmp(dev, "release") == 0;     /* PREFIX/F/release */
	if (!next_level(&p, kind) || *p != '\0') return false;
	return strcmp(dev, username) == 0 && (!strcmp(kind, "ack") || !strcmp(kind, "release"));
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *username = mosquitto_client_username(ed->client);
	(void)event;
	(void)userdata;

	if (!username || !*username || is_revoked(username)) return MOSQ_ERR_ACL_DENIED;
	if (ed->access != MOSQ_ACL_SUBSCRIBE || strchr(username, ':')) return MOSQ_ERR_PLUGIN_DEFER;
	if (!ed->topic) return MOSQ_ERR_ACL_DENIED;
	return subscription_allowed(username, ed->topic) ? MOSQ_ERR_PLUGIN_DEFER : MOSQ_ERR_ACL_DENIED;
}

static void load_revoked(void)
{
	struct stat st;
	FILE *f;
	char *buf;
	char *line;
	size_t got;

	if (!policy.revoked_path[0] || stat(policy.revoked_path, &st) != 0) return;
	if (st.st_mtime == policy.revoked_mtime && (long)st.st_size == policy.revoked_size) return;
	if (st.st_size > (1 << 24)) {
		mosquitto_log_printf(MOSQ_LOG_ERR, "cogbert_acl: %s is too large", policy.revoked_path);
		return;
	}
	f = fopen(policy.revoked_path, "rb");
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
	free(policy.revoked);
	policy.revoked = buf;
	policy.revoked_mtime = st.st_mtime;
	policy.revoked_size = (long)st.st_size;

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
	time_t now = time(NULL);
	(void)event;
	(void)event_data;
	(void)userdata;
	if (now != policy.last_check) {
		policy.last_check = now;
		load_revoked();
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
	(void)userdata;
	memset(&policy, 0, sizeof(policy));
	strcpy(policy.prefix, "cogbert/v1");
	for (i = 0; i < option_count; i++) {
		if (!strcmp(options[i].key, "prefix") && strlen(options[i].value) < sizeof(policy.prefix)) {
			strcpy(policy.prefix, options[i].value);
		} else if (!strcmp(options[i].key, "revoked_file") &&
		           strlen(options[i].value) < sizeof(policy.revoked_path)) {
			strcpy(policy.revoked_path, options[i].value);
		}
	}
	plugin_id = identifier;
	load_revoked();
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
	if (rc != MOSQ_ERR_SUCCESS) return rc;
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
	free(policy.revoked);
	policy.revoked = NULL;
	return MOSQ_ERR_SUCCESS;
}
