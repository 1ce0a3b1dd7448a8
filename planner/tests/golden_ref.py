"""Independent reference for tests/golden.rs: the planner's documented model
(model.md + the crate docs) written from the documentation, not from the Rust
code. Derived from the reviewer's ref.py (first-order model) with the documented
changes: exact integer ranking, the B-independent converged threshold,
post-copy stalls integrated in wall-clock time on the documented work-time grid
with the predictor-corrector step, a round resending every unit written during
it (the engine's dirty log is collected once per round), and a fault stalling
two round trips (one of bulk data queued ahead of the reply) plus the unit's
transmission.

Run: python3 tests/golden_ref.py   (prints the tiny.wmp and tie.wmp figures)"""
import math
def ell(k,n):
    k=min(k,n-0.5); return -math.log(1-k/n)
def p_any(x): return -math.expm1(-x)
def grid(dT, lam_max, u_max):
    t=[0.0]
    if lam_max>0:
        t1=min(dT*1e-4, 0.01/lam_max); span=dT/t1
        k=max(1,min(256,math.ceil(math.log(span)/math.log(1.3)))); rho=span**(1.0/k)
        for i in range(k): t.append(t1*rho**i)
    t.append(dT); w=len(t)-1
    if lam_max>0 and u_max>dT:
        span=u_max/dT; j=max(1,min(256,math.ceil(math.log(span)/math.log(1.3)))); rho=span**(1.0/j)
        for i in range(1,j): t.append(dT*rho**i)
        t.append(u_max)
    return t,w
def model(n,tau,pages,chunks,state,B,rtt,M,S,dT=20.0,target=None,maxr=30,shrink=0.05,conv=0.01,ps=4096,cs=65536,verbose=False):
    U=[]
    for i,(r,w,o,z) in enumerate(pages): U.append(dict(k=0,i=i,r=r,w=w,o=0,size=ps,z=z))
    for i,(r,w,o,z) in enumerate(chunks): U.append(dict(k=1,i=i,r=r,w=w,o=o,size=cs,z=z))
    for u in U:
        u['lr']=ell(u['r'],n)/tau; u['lw']=ell(u['w'],n)/tau
        fetch = 1.0 if u['k']==0 else ((1-u['o']/u['w']) if u['w']>0 else 0)
        u['la']=u['lr']+u['lw']*fetch
        f=lambda k: max(2*(n-min(k,n)),1)
        u['key']=(f(u['r'])*f(u['w']), u['w'], u['o'], u['z'])   # exact rank key
    def top(kind,frac):
        us=sorted([u for u in U if u['k']==kind], key=lambda u:(u['key'],u['i']))
        k=int(math.floor(frac*len(us)+0.5)); return us[:k], us[k:]
    sp,rp=top(0,M); sc,rc=top(1,S)
    setu=sp+sc
    fixed=state/B+rtt
    conv_bytes=conv*(state+max(ps,cs))
    sent=[u['size'] for u in setu]
    byts=sum(u['size'] for u in setu if not u['z'])
    Tpre=0; rounds=[]
    for k in range(maxr):
        t=byts/B; Tpre+=t; rem=0
        for j,u in enumerate(setu):
            x=u['lw']*t
            d=u['size']*p_any(x)
            sent[j]=d; rem+=d
        rounds.append((byts,t,rem))
        if rem<=0 or (target is not None and rem/B+fixed<=target) or rem<=conv_bytes or rem>=(1-shrink)*byts or k+1>=maxr: break
        byts=rem
    D=rem/B+fixed
    rest=sorted(rp+rc,key=lambda u:(u['key'],u['k'],u['i']))
    lam_max=max([u['la'] for u in U]+[0.0])
    u_max=sum(u['size'] for u in U if (not u['z']) or u['w']>0)/B
    t,wi=grid(dT,lam_max,u_max)
    arr=[]; pushed=0.0
    for u in rest:
        q=p_any(u['lw']*Tpre) if u['z'] else 1.0
        pushed+=q*u['size']
        arr.append((pushed,q,u['la'],2*rtt+u['size']/B))
    def absent(x,k):
        st=0.0; fl=0.0
        for (a,q,la,s) in arr:
            if a>x and q>0:
                m=q*(math.exp(-la*t[k])-math.exp(-la*t[k+1])); fl+=m; st+=m*s
        return st,fl
    Sx=0.0; F=0.0; Sw=None
    for k in range(len(t)-1):
        x=(t[k]+Sx)*B
        if x>=pushed: break
        a,af=absent(x,k)
        if af>0:
            c,cf=absent((t[k+1]+Sx+a)*B,k); Sx+=0.5*(a+c); F+=0.5*(af+cf)
        if k+1==wi: Sw=Sx
    if Sw is None: Sw=Sx
    Uu=pushed/B
    dTw=dT+Sw
    if verbose:
        print("pages", [u['i'] for u in sp], "|", [u['i'] for u in rp], "chunks", [u['i'] for u in sc], "|", [u['i'] for u in rc])
        print("rest", [(u['k'],u['i']) for u in rest])
        for r in rounds: print("round", r)
    return dict(rounds=len(rounds),T=Tpre+D+Uu,U=Uu,D=D,P=Sx,F=F,W=Sw,DeltaT=dTw,G=dT/(D+dTw),Tpre=Tpre,rem=rem)
if __name__=="__main__":
    # tiny.wmp at M = 1/3, S = 1/2, 1 Mbit/s, RTT 10 ms: default threshold, then
    # converged = 0.006 (the reviewer's 4 rounds).
    for conv in (0.01, 0.006):
        r=model(4,1.0,[(4,2,0,0),(1,1,0,0),(0,3,0,0)],[(2,2,1,0),(0,0,0,0)],100000,125000,0.010,1/3,0.5,conv=conv,verbose=True)
        for k,v in r.items(): print('tiny conv=%g'%conv, k, repr(v))
    # tie.wmp: n=3, pages (1,3) then (2,2); rank: (2,2) first (lower w)
    r=model(3,1.0,[(1,3,0,0),(2,2,0,0)],[],0,125000,0.010,0.5,0.0,verbose=True)
    for k,v in r.items(): print('tie',k, repr(v))
