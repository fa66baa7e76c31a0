% rebase('layout', title='#' + conv.code, me=me, csrf=csrf)
<h1>{{conv.line}} #{{conv.code}} from {{conv.sender}}</h1>
% if said:
<p class="said">{{said}}</p>
% end
% taken = f", taken by {conv.acknowledged_by}" if conv.acknowledged_by else ""
% due = f"; step {conv.step + 1}, next step due {shown(conv.deadline, conv.timezone)}" if conv.is_open else ""
<p>{{conv.status}}{{taken}}{{due}}</p>
% if conv.is_takeable:
<div class="actions">
  % for action, label in (('take', 'Take'), ('pass', 'Pass'), ('close', 'Close')):
  <form method="post" action="/c/{{conv.id}}/{{action}}" class="inline">
    <input type="hidden" name="csrf" value="{{csrf}}"><button type="submit">{{label}}</button>
  </form>
  % end
</div>
% end
% if conv.two_way:
<form method="post" action="/c/{{conv.id}}/reply">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <label>Text the customer <textarea name="text" maxlength="1600" required></textarea></label>
  <button type="submit">Reply</button>
</form>
% end
<h2>Timeline</h2>
<ol class="timeline">
% for e in entries:
  <li><time>{{shown(e['at'], conv.timezone)}}</time> {{e['what']}}
  % if e['status']:
  <em>{{e['status']}}</em>
  % end
  % if e['text']:
  <blockquote>{{e['text']}}</blockquote>
  % end
  </li>
% end
</ol>
