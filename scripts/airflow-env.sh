# Source me: the embedded Airflow setup of this checkout (SQLite metadata, repo's dags/).
# Overrides: AIRFLOW_HOME, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN (e.g. PostgreSQL), CHARLLM_HOME.
_charllm_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$_charllm_root/airflow-home}"
export AIRFLOW__CORE__DAGS_FOLDER="$_charllm_root/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$_charllm_root/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}"
export AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT=120
export AIRFLOW__LOGGING__LOGGING_LEVEL="${AIRFLOW__LOGGING__LOGGING_LEVEL:-INFO}"
export CHARLLM_HOME="${CHARLLM_HOME:-$_charllm_root/var}"
mkdir -p "$AIRFLOW_HOME" "$CHARLLM_HOME"
