# Source me: the embedded Airflow setup of this checkout (SQLite metadata, repo's dags/).
# Overrides: AIRFLOW_HOME, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN (e.g. PostgreSQL), CHARLLM_HOME.
_charllm_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$_charllm_root/airflow-home}"
export AIRFLOW__CORE__DAGS_FOLDER="$_charllm_root/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$_charllm_root/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}"
export AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT=120
# a campaign maps one task group per cell repeat: up to 10,000 cells (Airflow's default is 1024)
export AIRFLOW__CORE__MAX_MAP_LENGTH="${AIRFLOW__CORE__MAX_MAP_LENGTH:-100000}"
export AIRFLOW__LOGGING__LOGGING_LEVEL="${AIRFLOW__LOGGING__LOGGING_LEVEL:-INFO}"
export CHARLLM_HOME="${CHARLLM_HOME:-$_charllm_root/var}"
mkdir -p "$AIRFLOW_HOME" "$CHARLLM_HOME"
