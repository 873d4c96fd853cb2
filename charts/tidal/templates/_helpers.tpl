{{/*
Names are fixed, not derived from the release: the cluster-scoped objects (CRDs, ClusterRoles,
PriorityClasses, the admission policy) and the scheduler's lease carry the names the Python
components use, so one release per cluster (a second fails with "invalid ownership metadata").
*/}}

{{/* The chart label value: name-version. */}}
{{- define "tidal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The labels of every object: (dict "context" $ "name" NAME "component" COMPONENT). NAME and
COMPONENT are the app.kubernetes.io/name and component the Python manifests use.
*/}}
{{- define "tidal.labels" -}}
{{- $ctx := .context -}}
helm.sh/chart: {{ include "tidal.chart" $ctx }}
{{ include "tidal.selectorLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: tidal
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* What a workload's selector matches: (dict "context" $ "name" NAME). */}}
{{- define "tidal.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
{{- end -}}

{{/* The tidal image (operator, extender, node agent): repository:tag, tag defaulting to appVersion. */}}
{{- define "tidal.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/*
kube-scheduler's image: its tag defaults to the server's version with any suffix stripped
(v1.34.4-eks-1234 → v1.34.4): a kube-scheduler must not be newer than its API server, and
registry.k8s.io publishes plain release tags only.
*/}}
{{- define "tidal.kubeSchedulerImage" -}}
{{- $image := .Values.scheduler.kubeScheduler.image -}}
{{- $server := regexReplaceAll "[-+].*$" .Capabilities.KubeVersion.Version "" -}}
{{- printf "%s:%s" $image.repository ($image.tag | default $server) -}}
{{- end -}}

{{- define "tidal.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Whether kube-scheduler and the extender share a pod (the extender on loopback). */}}
{{- define "tidal.extenderSidecar" -}}
{{- if eq .Values.scheduler.extender.mode "sidecar" }}true{{ end -}}
{{- end -}}

{{/* kube-scheduler replicas elect a leader (a Lease named tidal-scheduler in the release namespace). */}}
{{- define "tidal.schedulerLeaderElect" -}}
{{- if gt (int .Values.scheduler.replicas) 1 }}true{{ end -}}
{{- end -}}

{{/*
Where the extender runs: in the tidal-scheduler pod (sidecar mode) or in its own tidal-extender
Deployment (split mode). The name of its Deployment, Service (the ServiceMonitor's job label)
and ServiceAccount.
*/}}
{{- define "tidal.extenderWorkload" -}}
{{- if include "tidal.extenderSidecar" . }}tidal-scheduler{{ else }}tidal-extender{{ end -}}
{{- end -}}
{{- define "tidal.extenderServiceAccount" -}}
{{- include "tidal.extenderWorkload" . -}}
{{- end -}}

{{/* The Secrets of split mode's mutual TLS: the extender's serving certificate and kube-scheduler's client certificate. */}}
{{- define "tidal.extenderServerSecret" -}}
{{- .Values.scheduler.extender.tls.existingSecret | default "tidal-extender-tls" -}}
{{- end -}}
{{- define "tidal.extenderClientSecret" -}}
{{- .Values.scheduler.extender.tls.existingClientSecret | default "tidal-scheduler-client-tls" -}}
{{- end -}}

{{/*
A Deployment's spread: with several replicas and no affinity given, prefer one replica per node.
(dict "context" $ "name" NAME "replicas" N "affinity" AFFINITY)
*/}}
{{- define "tidal.affinity" -}}
{{- if .affinity }}
affinity:
  {{- toYaml .affinity | nindent 2 }}
{{- else if gt (int .replicas) 1 }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "tidal.selectorLabels" . | nindent 14 }}
{{- end }}
{{- end -}}

{{/* nodeSelector, tolerations and priorityClassName of a pod: (dict "nodeSelector" ... "tolerations" ... "priorityClassName" ...). */}}
{{- define "tidal.placement" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
