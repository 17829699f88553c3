{{/* The base name of every object. */}}
{{- define "forge-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Pod selector. */}}
{{- define "forge-operator.selectorLabels" -}}
app.kubernetes.io/name: forge-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "forge-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "forge-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeforge
{{- end -}}

{{- define "forge-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "forge-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The watched namespaces as a JSON list (use with fromJsonArray). */}}
{{- define "forge-operator.watchNamespaces" -}}
{{- default (list .Release.Namespace) .Values.watchNamespaces | uniq | toJson -}}
{{- end -}}

{{/* The progress receiver's URL as the job pods see it (--progress-url-base). */}}
{{- define "forge-operator.progressUrlBase" -}}
{{- printf "http://%s.%s.svc:%v" (include "forge-operator.fullname" .) .Release.Namespace .Values.progressService.port -}}
{{- end -}}

{{/* What the operator does inside a namespace it watches; granted by a Role there, or by a
ClusterRole in cluster-wide mode. Keep in step with what kubeforge_operator creates. */}}
{{- define "forge-operator.jobRules" -}}
- apiGroups: [kubeforge.dev]
  resources: [rljobs]
  verbs: [get, list, watch, patch, delete]  # delete: spec.ttlSecondsAfterFinished
- apiGroups: [kubeforge.dev]
  resources: [rljobs/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]  # never read: tokens are derived from the operator's key (kubeforge_operator.signing)
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]  # get: an existing <job>-spec must be the job's own; patch: spec edits
- apiGroups: [""]
  resources: [services]
  verbs: [create]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, create, delete]  # spec.checkpoint.storage: the claim of each job's run directory
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
- apiGroups: [scheduling.x-k8s.io, scheduling.volcano.sh]
  resources: [podgroups]
  verbs: [create]
{{- end -}}

{{/* A label map as the operator's --scraper-* flags take it: k=v,k2=v2 (keys sorted). */}}
{{- define "forge-operator.labelPairs" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* The Secret holding the token signing key: the user's, or the one this chart makes. */}}
{{- define "forge-operator.tokenKeySecret" -}}
{{- .Values.tokenKey.existingSecret | default (printf "%s-token-key" (include "forge-operator.fullname" .)) -}}
{{- end -}}
