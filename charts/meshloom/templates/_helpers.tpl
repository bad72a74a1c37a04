{{/*
Names are fixed, not derived from the release name: the injector, the controller and the CLI refer to them by
name (Service meshloom-controller, MutatingWebhookConfiguration meshloom-injector, ConfigMap meshloom-injection),
so one mesh is installed per cluster.
*/}}

{{- define "meshloom.labels" -}}
app.kubernetes.io/name: meshloom
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshloom
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: stable across upgrades (a Deployment's selector cannot change). */}}
{{- define "meshloom.selector" -}}
app.kubernetes.io/name: meshloom
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Labels of the control plane's own pods: never injected (the webhook's objectSelector skips them, whichever
namespace they run in).
*/}}
{{- define "meshloom.podLabels" -}}
{{ include "meshloom.selector" . }}
app.kubernetes.io/part-of: meshloom
injector.nsm.nginx.com/auto-inject: disabled
{{- end -}}

{{- define "meshloom.image" -}}
{{ printf "%s:%s" .repository .tag | quote }}
{{- end -}}

{{/* The container security context of every control-plane container that needs no privilege. */}}
{{- define "meshloom.restricted" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}
