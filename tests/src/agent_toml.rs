//! Agent configuration files of the end-to-end tests: the head every in-process agent of a run
//! shares (its id and region, and the run's broker as user `agent`), and `[[targets]]` entries.

use crate::harness::{write_file, Run};

/// `agent_id`, `region`, `state_dir` (the run's folder: the spool, `uplink.spool_max_bytes`,
/// lives there, per agent id) and the `[mqtt]` section for `run`'s broker: user `agent` with its
/// password in the run's `agent.pw` (written here), topics under the run's prefix. The caller
/// appends `[uplink]`, `[[targets]]` and so on.
pub fn agent_head(run: &Run, agent_id: &str, region: &str) -> String {
    let pw = run.dir.join("agent.pw");
    write_file(&pw, "agent-secret");
    format!(
        "agent_id = \"{agent_id}\"\nregion = \"{region}\"\nstate_dir = \"{state_dir}\"\n\n\
         [mqtt]\nhost = \"{host}\"\n\
         port = {port}\nusername = \"agent\"\npassword_file = \"{pw}\"\n\
         topic_prefix = \"{prefix}\"\n",
        state_dir = run.dir.display(),
        host = run.services.mqtt_host,
        port = run.services.mqtt_port,
        pw = pw.display(),
        prefix = run.prefix(),
    )
}

/// One `[[targets]]` entry: target `id` at `url` every `interval` with `timeout`, and `extra`
/// lines (e.g. `regex = "target: ok"`).
pub fn target_entry(id: u32, url: &str, interval: &str, timeout: &str, extra: &str) -> String {
    format!(
        "\n[[targets]]\nid = {id}\nurl = \"{url}\"\ninterval = \"{interval}\"\n\
         timeout = \"{timeout}\"\n{extra}"
    )
}

/// Writes `text` to `name` in the run's folder and loads it as an agent configuration.
pub fn load_agent_config(run: &Run, name: &str, text: &str) -> vantage_agent::Config {
    let path = run.dir.join(name);
    write_file(&path, text);
    vantage_agent::Config::load(&path).unwrap_or_else(|e| panic!("agent config {name}: {e}"))
}
